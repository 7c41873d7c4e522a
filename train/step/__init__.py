"""The step floor: tokenizing and encoding a rank's texts in length buckets (encoding.py), GradCache
(grad_cache.py), and inline dynamic hard-negative mining (mining.py)."""
