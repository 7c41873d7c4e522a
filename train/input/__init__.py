"""The input floor: one JSONL line -> a validated example (records.py), the streamed, shuffled, resumable
global batches of a corpus (data.py), and the thread that reads them ahead of the step (prefetch.py)."""
