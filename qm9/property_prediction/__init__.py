"""Property classifiers for EDM's conditional evaluation (Table 3): the EGNN regressor and the
#Atoms baseline (``models_property``)."""
