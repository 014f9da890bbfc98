"""Count the items in warehouse bin photos."""
