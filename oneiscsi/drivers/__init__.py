"""Driver actions."""
