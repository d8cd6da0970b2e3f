"""The course layer: doctor, the small VM, checks, plots, widgets, grading."""
