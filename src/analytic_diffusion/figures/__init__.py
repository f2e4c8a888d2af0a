"""Figures of analyses: neighbour mosaics, histograms; `pyplot()`, the one headless matplotlib every figure uses."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
