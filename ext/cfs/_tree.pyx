# placeholder: the config-tree index (issue 3)
def _placeholder():
    return 0
