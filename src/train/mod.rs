//! Training loop, schedules, checkpoints.
