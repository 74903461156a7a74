"""direct transport."""
