"""Moving token rows to the experts that process them (and back) across expert-parallel ranks."""
