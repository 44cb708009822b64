"""Building blocks of kdx-table and kdx-runs: config differences, statistics, training curves.

None of these modules imports torch or Lightning; they read run records (:mod:`kdx.record`) and
the CSV logs beside them.
"""
