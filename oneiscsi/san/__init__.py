"""Command-line client of the EqualLogic group CLI."""
