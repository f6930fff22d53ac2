"""Bot configuration, contacts and conversations, memory and the reply pipeline."""
