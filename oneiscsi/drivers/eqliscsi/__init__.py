"""The Dell EqualLogic PS driver (`eqliscsi`): datastore actions in ds.py, shared helpers in common.py."""
