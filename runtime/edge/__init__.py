"""The edge agent: answers on the laptop, escalates through the outbox, syncs knowledge with the core."""
