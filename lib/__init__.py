"""Learn a person's mask and the scene's depth from a background and the same scene with the person in it."""
