"""Runtime: schedules as data, weight versions, executors."""
