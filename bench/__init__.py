"""flowsort bench."""
