"""Step 3: the context-dependency score (eq. 2), multi-process sharding, [IND] selection (Table 3), score analyses."""
