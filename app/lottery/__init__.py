"""lottery"""
