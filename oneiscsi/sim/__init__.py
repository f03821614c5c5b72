"""Lab components: EqualLogic group simulator, tgtd wrapper, test hosts."""
