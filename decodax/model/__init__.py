"""The model state and the one pure forward function."""
