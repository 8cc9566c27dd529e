"""The SmolLM2 conversion cache (``leank.models.smollm2_dir``) with processes that start together.

Found on a GPU machine: seven ``leank eval`` processes started at once on an empty cache; one
finished converting and moved its directory into place, a second then removed it as "a broken
earlier conversion" while a third was loading from it ("no file named model.safetensors").
"""

from __future__ import annotations

import pytest

from leank import models


class FakeSaver:
    """Stands in for the converted model and tokenizer: writes the files a conversion writes,
    and can run ``during`` (another process's action) while it saves."""

    def __init__(self, name: str, marker: str, during=None):
        self.name, self.marker, self.during = name, marker, during

    def save_pretrained(self, directory) -> None:
        (directory / self.name).write_text(self.marker)
        if self.during is not None:
            self.during()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANK_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    return tmp_path / "models" / models.SMOLLM2_ALIAS


def convert_with(monkeypatch, marker: str, during=None) -> None:
    class Model(FakeSaver):
        config = type("Config", (), {})()

    model = Model("model.safetensors", marker)
    tokenizer = FakeSaver("config.json", marker, during)
    monkeypatch.setattr(models, "_load_gguf", lambda path: (model, tokenizer))


def write_complete(target, marker: str) -> None:
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (target / name).write_text(marker)


def test_a_conversion_that_finishes_second_keeps_the_first(cache, monkeypatch):
    # While this process saves, another one moves its complete conversion into place.
    convert_with(monkeypatch, "mine", during=lambda: write_complete(cache, "theirs"))
    assert models.smollm2_dir() == cache
    assert (cache / "model.safetensors").read_text() == "theirs"
    assert (cache / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in cache.parent.iterdir()) == [".lock", models.SMOLLM2_ALIAS]  # no temporary


def test_a_broken_conversion_is_replaced(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("torn")  # no weights: a conversion killed half-way (older code)
    convert_with(monkeypatch, "mine")
    assert models.smollm2_dir() == cache
    assert (cache / "model.safetensors").read_text() == "mine"
    assert (cache / "config.json").read_text() == "mine"


def test_a_complete_conversion_is_used_as_it_is(cache, monkeypatch):
    write_complete(cache, "cached")
    monkeypatch.setattr(models, "_load_gguf", lambda path: pytest.fail("converted again"))
    assert models.smollm2_dir() == cache
    assert (cache / "model.safetensors").read_text() == "cached"


def _convert_in_child(queue) -> None:
    try:
        queue.put(str(models.smollm2_dir()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put(f"error: {e!r}")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork (the fakes are inherited)")
def test_the_move_into_place_waits_for_the_lock(cache, monkeypatch):
    """A process that finishes its conversion while another holds the cache lock waits, then keeps
    the other's complete conversion (without the lock it would check, then move or remove, at once)."""
    import multiprocessing as mp

    convert_with(monkeypatch, "mine")
    cache.parent.mkdir(parents=True)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with models._cache_lock(cache.parent):
        child = ctx.Process(target=_convert_in_child, args=(queue,))
        child.start()
        child.join(timeout=3)
        assert child.is_alive()  # blocked on the lock, after its conversion
        write_complete(cache, "theirs")
    child.join(timeout=30)
    assert queue.get(timeout=5) == str(cache)
    assert (cache / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in cache.parent.iterdir()) == [".lock", models.SMOLLM2_ALIAS]


def test_a_killed_conversions_leftover_is_removed_by_the_next(cache, monkeypatch):
    """A conversion killed mid-save leaves its temporary directory (the size of the model); the
    next use of the cache removes such leftovers once no one has written to them for an hour, and
    keeps a recent one (another process may be converting into it) — converted already or not."""
    import os
    import time

    cache.parent.mkdir(parents=True)
    old, recent = cache.parent / f".{models.SMOLLM2_ALIAS}.killed", cache.parent / f".{models.SMOLLM2_ALIAS}.busy"
    for path in (old, recent):
        path.mkdir()
        (path / "model.safetensors").write_text("partial")
    an_hour_and_more = time.time() - models.ABANDONED_AFTER_S - 60
    os.utime(old, (an_hour_and_more, an_hour_and_more))
    convert_with(monkeypatch, "mine")
    assert models.smollm2_dir() == cache
    assert not old.exists() and recent.is_dir()
    assert (cache / "model.safetensors").read_text() == "mine"
    os.utime(recent, (an_hour_and_more, an_hour_and_more))  # the busy one was killed too
    assert models.smollm2_dir() == cache  # converted already: nothing converted again ...
    assert not recent.exists()  # ... and its leftover is gone
