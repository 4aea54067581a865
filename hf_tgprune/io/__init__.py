"""Files and the Hub (layer 2, above `core`): the dense and bitmask formats and `sparsity.json`
(`serialization/`), loading classifiers, model cards, uploads, and the sparse inference export."""
