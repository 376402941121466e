"""Classical (bottom-up) segmentation: tools without training, and baselines for the networks.

Every method takes an image as a float array ``(*spatial, C)`` (2D ``(W, H, C)`` or 3D ``(X, Y, Z, C)``, channels
last; ``spacing`` in mm per spatial axis) and returns a label map on the same grid. :mod:`medseg.classical.io`
turns files into that array and back, keeping the exact grid (PNG for 2D images, NIfTI otherwise); the command
line is ``medseg segment METHOD`` (:mod:`medseg.cli.segment`).

=====================  ==========================================================  ======  ===========================
method                 what                                                        dims    uses
=====================  ==========================================================  ======  ===========================
``kmeans``             k-means in a feature space                                  2D, 3D  scikit-learn
``gmm``                EM for a Gaussian mixture; soft posteriors                  2D, 3D  scikit-learn
``meanshift``          mean shift (bandwidth its one parameter)                    2D, 3D  scikit-learn
``graphcut``           seeded binary min-cut / max-flow (Boykov & Jolly 2001)      2D, 3D  PyMaxflow + own energy
``grabcut``            iterated GMM + graph cut from a box (Rother et al. 2004)    2D, 3D  PyMaxflow, scikit-learn
``random-walker``      random walker from scribbles (Grady 2006)                   2D, 3D  scikit-image
``ncut``               normalized cuts over a superpixel RAG (Shi & Malik 2000)    2D, 3D  scikit-image
``slic``               SLIC superpixels / supervoxels (Achanta et al. 2012)        2D, 3D  scikit-image
``felzenszwalb``       graph-based oversegmentation (Felzenszwalb & H. 2004)       2D      scikit-image
``watershed``          marker-based watershed of the gradient (Meyer 1994)         2D, 3D  scikit-image
``snake``              discrete snake, greedy (Williams & Shah 1992) or dynamic    2D      own code
                       programming (Amini et al. 1990)
``chan-vese``          morphological Chan–Vese (Márquez-Neila et al. 2014)         2D, 3D  scikit-image
``crf``                dense CRF refinement of probabilities (Krähenbühl 2011)     2D, 3D  pydensecrf2
=====================  ==========================================================  ======  ===========================

The libraries are the optional extra ``classical`` (``pip install 'medseg[classical]'``); they are imported inside
the methods, so ``import medseg`` works without them, and a missing one is a :class:`~medseg.errors.MedsegError`
naming the pip command.

Example:
    >>> import numpy as np
    >>> from medseg.classical import kmeans
    >>> image = np.zeros((20, 20, 1), np.float32); image[5:15, 5:15] = 1.0
    >>> labels = kmeans(image, k=2)
    >>> int(labels[10, 10]), int(labels[0, 0])
    (2, 1)
"""
from __future__ import annotations

import importlib

from medseg.errors import MedsegError

# method name -> (module, function, spatial dims it supports)
METHODS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "kmeans": ("clustering", "kmeans", (2, 3)),
    "gmm": ("clustering", "gmm", (2, 3)),
    "meanshift": ("clustering", "meanshift", (2, 3)),
    "graphcut": ("graph", "graph_cut", (2, 3)),
    "grabcut": ("graph", "grabcut", (2, 3)),
    "random-walker": ("graph", "random_walker", (2, 3)),
    "ncut": ("graph", "normalized_cut", (2, 3)),
    "slic": ("superpixels", "slic", (2, 3)),
    "felzenszwalb": ("superpixels", "felzenszwalb", (2,)),
    "watershed": ("superpixels", "watershed", (2, 3)),
    "snake": ("contours", "snake", (2,)),
    "chan-vese": ("contours", "chan_vese", (2, 3)),
    "crf": ("crf", "dense_crf", (2, 3)),
}

# pip names of the modules the methods import
_PIP = {"sklearn": "scikit-learn", "skimage": "scikit-image", "maxflow": "PyMaxflow", "pydensecrf": "pydensecrf2",
        "nilearn": "nilearn"}


def require(module: str, method: str):
    """Import ``module`` for ``method``, or a :class:`MedsegError` naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MedsegError(f"method '{method}' needs {_PIP.get(top, top)}, which is not installed: "
                          f"pip install {_PIP.get(top, top)} (or pip install 'medseg[classical]' for all classical methods)") from None


def method_function(name: str):
    """The function of method ``name`` (see :data:`METHODS`)."""
    from medseg.errors import check_choice

    check_choice(name, tuple(METHODS), "method")
    module, func, _ = METHODS[name]
    return getattr(importlib.import_module(f"medseg.classical.{module}"), func)


_LAZY = {"kmeans": "clustering", "gmm": "clustering", "meanshift": "clustering", "cluster_features": "features",
         "graph_cut": "graph", "grabcut": "graph", "random_walker": "graph", "normalized_cut": "graph",
         "slic": "superpixels", "felzenszwalb": "superpixels", "watershed": "superpixels",
         "snake": "contours", "snake_greedy": "contours", "snake_dp": "contours", "chan_vese": "contours",
         "dense_crf": "crf", "select_regions": "regions", "largest_component": "regions"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"medseg.classical.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medseg.classical' has no attribute {name!r}")


__all__ = ["METHODS", "require", "method_function", *_LAZY]
