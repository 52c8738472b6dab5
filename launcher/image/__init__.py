"""Container images of the Ascend version matrix (images/matrix.yaml): the entries and their builds."""
