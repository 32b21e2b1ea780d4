"""NSA ops: the checked, dispatched public functions live in `dispatch`; backends sit beside it."""
