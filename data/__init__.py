"""The embedded task, its scripted teachers, the JSONL schema and loader, and the tiny student recipe."""
