"""Data sets of the course: the embedded ShapesWorld and loaders for real data sets."""
