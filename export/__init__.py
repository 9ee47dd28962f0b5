"""effiseg.export"""
