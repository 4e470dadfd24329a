"""reputation"""
