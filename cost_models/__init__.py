"""Cost models: device specs, analytic (roofline) and profiled costs, memory model."""
