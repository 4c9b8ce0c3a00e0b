"""Orders that cancel themselves on time, exactly once."""
