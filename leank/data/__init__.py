"""Offline long-context data: haystack text (``text``), RULER tasks (``tasks``), RULER's
own JSONL files (``ruler_jsonl``) and training samples for mask distillation (``training``)."""
