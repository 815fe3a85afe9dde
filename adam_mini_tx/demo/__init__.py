"""The demo: a small GPT trained on Shakespeare with AdamW and Adam-mini side by side."""
