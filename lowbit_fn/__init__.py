"""lowbit_fn"""
