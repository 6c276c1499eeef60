"""App: batch jobs of batch.py (local or Ray Data), their records and journal."""
