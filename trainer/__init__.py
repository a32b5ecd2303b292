"""flowsort trainer."""
