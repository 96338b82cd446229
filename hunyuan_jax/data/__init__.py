"""Text data: documents, JSONL and chat data and packing; tokenizers; chat template; special
tokens."""
