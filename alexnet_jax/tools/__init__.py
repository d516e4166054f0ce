"""Command-line tools that prepare what training needs."""
