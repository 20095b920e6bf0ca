"""The one training loop for every stage: optimizer and schedule, loss, resume state, run folder."""
