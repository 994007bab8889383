"""The server's clients: trainer workers and the evaluator."""
