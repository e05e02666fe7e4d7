# The wire encoder's sizes (included by _fastpath.pxd; the encoder is _fastpath_encode.pxi):
# the most each message it writes can take, from the limits on what goes into
# it. The buffers of report_wire and apply_batch are sized by these.

cdef enum:
    VARINT_BYTES_MAX = 10                          # a 64-bit varint
    VARINT_FIELD_MAX = 1 + VARINT_BYTES_MAX        # a tag (fields 1 to 15 take one byte) and a varint
    NAME_FIELD_MAX = 2 + NAME_BYTES_MAX            # a tag, a one-byte length and a credit type's name
    MODE_FIELD_MAX = 2 + MODE_BYTES_MAX            # the same for a fallback mode's name
    # The tag and length of an embedded message: the bodies below are all under 2**14 bytes.
    MESSAGE_HEAD_MAX = 3
    # ReportBatchResponse.denials: index, reason.
    DENIAL_BODY_MAX = 2 * VARINT_FIELD_MAX
    # ReportBatchResponse.degradations: index, mode, priority.
    DEGRADATION_BODY_MAX = 2 * VARINT_FIELD_MAX + MODE_FIELD_MAX
    # ReportBatchResponse.results: index, decision, reason, credit type, cost, balance, mode, priority.
    RESULT_BODY_MAX = 6 * VARINT_FIELD_MAX + NAME_FIELD_MAX + MODE_FIELD_MAX
    # What apply_batch writes per event: a denial or a degradation, and with details a result.
    BATCH_EVENT_MAX = MESSAGE_HEAD_MAX + DEGRADATION_BODY_MAX
    BATCH_RESULT_MAX = MESSAGE_HEAD_MAX + RESULT_BODY_MAX
    # ReportResponse: decision, reason, credit type, cost, balance, mode, priority.
    REPORT_RESPONSE_MAX = 5 * VARINT_FIELD_MAX + NAME_FIELD_MAX + MODE_FIELD_MAX
