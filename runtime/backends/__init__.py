"""effiseg.runtime.backends"""
