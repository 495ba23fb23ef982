"""Classical reconstruction: MAP refinement by EM over poses (gold-standard half-sets) and 3-D
classification, RELION's algorithms on cryoscape's kernels (see em.py for why this package sits
between posesearch/ and train/)."""
