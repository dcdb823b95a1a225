"""What every campaign kind shares: the definition cache, dispatch by kind, operator commands."""
