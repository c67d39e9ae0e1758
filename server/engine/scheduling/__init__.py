"""The scheduler and its ways of stepping: which sessions step each iteration and what they
consume (scheduler.py, its commands in scheduler_commands.py, an ordinary step's halves in
row_updates.py), prompts in chunks (prefill.py), a lone session's and a batch's stretches
(stretch.py, batch_stretch.py), plainly running requests as arrays (steady_lane.py, lane_glue.py),
the prefix-state cache at work (prefix_states.py), and per-session and per-request state with the
undo window and snapshots (slot_state.py, undo_window.py)."""
