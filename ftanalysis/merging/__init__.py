"""Task vectors and model-merging rules (task arithmetic, TIES, DARE, Breadcrumbs, LiNeS, soups, Model Stock)."""
