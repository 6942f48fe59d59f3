"""Print README's backend table, generated from the declarations:  python -m tlv_fast.backend_table"""
from .backends import markdown_table

if __name__ == "__main__":
    print(markdown_table())
