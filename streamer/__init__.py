"""flowsort streamer."""
