# Makes conf/ the package kdx.conf inside an installed kdx (pyproject.toml maps it), so that the
# entry points find their configs through Hydra's pkg://kdx.conf from any folder, wheel or editable.
