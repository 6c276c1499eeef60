"""Loading, preprocessing, generation and the shared CLI code."""
