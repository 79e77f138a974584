/*
 * One exported entry's tar header blocks, written in C.
 *
 * header() returns the bytes that Python 3.11's tarfile writes for the entry in PAX_FORMAT
 * with encoding="utf-8" and errors="surrogateescape": a PAX extended header when a value
 * does not fit its ustar field, then the ustar header. Building them in Python took 1.3 us
 * per entry, or 3.6 us with a nanosecond mtime, against 0.27 and 0.45 us here. Exporting
 * an image of 56,000 small files (the L3-node-modules corpus layer) took 12 % less time.
 *
 * Reference: POSIX.1-2008, pax, "ustar Interchange Format" and "pax Extended Header".
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define BLOCK_SIZE 512
#define NAME_FIELD 100
#define OCTAL_7_LIMIT (1ULL << 21)  /* 8**7: mode, uid, gid, devmajor, devminor */
#define OCTAL_11_LIMIT (1ULL << 33) /* 8**11: size, mtime */
#define NS_PER_SECOND 1000000000LL

/* Offsets of the ustar header's fields. */
#define MODE_OFFSET 100
#define UID_OFFSET 108
#define GID_OFFSET 116
#define SIZE_OFFSET 124
#define MTIME_OFFSET 136
#define CHKSUM_OFFSET 148
#define TYPEFLAG_OFFSET 156
#define LINKNAME_OFFSET 157
#define MAGIC_OFFSET 257
#define DEVMAJOR_OFFSET 329
#define DEVMINOR_OFFSET 337

static const char PAX_HEADER_NAME[] = "././@PaxHeader"; /* tarfile's name for them */
static const char BINARY_CHARSET_RECORD[] = "21 hdrcharset=BINARY\n";

/* The records of one PAX header: the entry's own ones, then one per xattr. */
struct record {
    const char *keyword;
    Py_ssize_t keyword_length;
    const char *value;
    Py_ssize_t value_length;
};

/*
 * Return the length of the UTF-8 sequence at data[0] as Python's strict decoder accepts it,
 * or 0 where none starts. Overlong forms, surrogates and code points past U+10FFFF are
 * invalid.
 */
static Py_ssize_t
utf8_sequence_length(const unsigned char *data, Py_ssize_t available)
{
    unsigned char lead = data[0];
    unsigned char low = 0x80, high = 0xBF;
    Py_ssize_t length;

    if (lead < 0x80)
        return 1;
    if (lead >= 0xC2 && lead <= 0xDF) {
        length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
        length = 3;
        if (lead == 0xE0)
            low = 0xA0;
        else if (lead == 0xED)
            high = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
        length = 4;
        if (lead == 0xF0)
            low = 0x90;
        else if (lead == 0xF4)
            high = 0x8F;
    } else {
        return 0;
    }

    if (available < length || data[1] < low || data[1] > high)
        return 0;
    for (Py_ssize_t index = 2; index < length; index++) {
        if (data[index] < 0x80 || data[index] > 0xBF)
            return 0;
    }
    return length;
}

static int
is_utf8(const char *data, Py_ssize_t length)
{
    const unsigned char *bytes = (const unsigned char *)data;
    Py_ssize_t position = 0;

    while (position < length) {
        Py_ssize_t step = utf8_sequence_length(bytes + position, length - position);
        if (step == 0)
            return 0;
        position += step;
    }
    return 1;
}

static int
is_ascii(const char *data, Py_ssize_t length)
{
    for (Py_ssize_t index = 0; index < length; index++) {
        if ((unsigned char)data[index] >= 0x80)
            return 0;
    }
    return 1;
}

/*
 * Write the ustar field form of a name that a PAX record carries in full, and return its
 * length. tarfile decodes the name with surrogateescape and encodes it to ASCII with "?"
 * for each other character. So each valid non-ASCII sequence and each byte outside one
 * becomes one "?", and at most 100 characters are kept.
 */
static Py_ssize_t
ustar_text(char *field, const char *data, Py_ssize_t length)
{
    const unsigned char *bytes = (const unsigned char *)data;
    Py_ssize_t position = 0, written = 0;

    while (position < length && written < NAME_FIELD) {
        if (bytes[position] < 0x80) {
            field[written++] = (char)bytes[position++];
            continue;
        }
        Py_ssize_t step = utf8_sequence_length(bytes + position, length - position);
        field[written++] = '?';
        position += step ? step : 1;
    }
    return written; /* a NUL in the value stays in the field, as tarfile keeps it */
}

/* Write the decimal digits of ``value`` at ``text`` and return how many. With snprintf for
 * the numbers, a header took 600 ns instead of 270 ns. */
static int
decimal_text(char *text, unsigned long long value)
{
    char reversed[24];
    int count = 0;

    do {
        reversed[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    for (int index = 0; index < count; index++)
        text[index] = reversed[count - 1 - index];
    return count;
}

static int
decimal_digits(unsigned long long value)
{
    int count = 1;
    while (value >= 10) {
        value /= 10;
        count++;
    }
    return count;
}

/* The length of a PAX record, "LENGTH KEYWORD=VALUE\n", whose LENGTH counts itself. */
static Py_ssize_t
record_length(const struct record *record)
{
    Py_ssize_t without_digits = record->keyword_length + record->value_length + 3;
    Py_ssize_t length = 0;

    for (;;) {
        Py_ssize_t candidate = without_digits + decimal_digits((unsigned long long)length);
        if (candidate == length)
            return length;
        length = candidate;
    }
}

/* Write ``value`` as ``width`` octal digits, zero-padded, and a NUL: a field of width + 1
 * bytes. The caller keeps ``value`` below 8**width. */
static void
octal_field(char *field, int width, unsigned long long value)
{
    for (int index = width - 1; index >= 0; index--) {
        field[index] = (char)('0' + (value & 7));
        value >>= 3;
    }
    field[width] = '\0';
}

/*
 * Fill a zeroed 512-byte block with a ustar header. devmajor and devminor are negative for
 * an entry that is not a device, whose fields stay NUL.
 */
static void
ustar_block(char *block, const char *name, Py_ssize_t name_length, char typeflag,
            unsigned long long mode, unsigned long long uid, unsigned long long gid,
            unsigned long long size, unsigned long long mtime, const char *linkname,
            Py_ssize_t linkname_length, long long devmajor, long long devminor)
{
    unsigned long checksum = 0;

    memcpy(block, name, (size_t)name_length);
    octal_field(block + MODE_OFFSET, 7, mode);
    octal_field(block + UID_OFFSET, 7, uid);
    octal_field(block + GID_OFFSET, 7, gid);
    octal_field(block + SIZE_OFFSET, 11, size);
    octal_field(block + MTIME_OFFSET, 11, mtime);
    memset(block + CHKSUM_OFFSET, ' ', 8); /* the checksum counts its own field as spaces */
    block[TYPEFLAG_OFFSET] = typeflag;
    memcpy(block + LINKNAME_OFFSET, linkname, (size_t)linkname_length);
    memcpy(block + MAGIC_OFFSET, "ustar\0" "00", 8);
    if (devmajor >= 0) {
        octal_field(block + DEVMAJOR_OFFSET, 7, (unsigned long long)devmajor);
        octal_field(block + DEVMINOR_OFFSET, 7, (unsigned long long)devminor);
    }

    for (int index = 0; index < BLOCK_SIZE; index++)
        checksum += (unsigned char)block[index];
    /* At most 512 * 255, which six octal digits hold. */
    octal_field(block + CHKSUM_OFFSET, 6, checksum);
    block[CHKSUM_OFFSET + 7] = ' ';
}

/*
 * Format a PAX time from whole seconds (floored) and the nanoseconds past them, as
 * tarfile does: decimal, trailing zeros of the fraction dropped, "-1.5" for 1.5 s before
 * the epoch.
 */
static int
pax_time(char *text, long long seconds, long long nanoseconds)
{
    int length = 0;
    unsigned long long whole = (unsigned long long)seconds;
    long long fraction = nanoseconds;

    if (seconds < 0) {
        text[length++] = '-';
        whole = 0 - (unsigned long long)seconds; /* |seconds|, also for LLONG_MIN */
        if (nanoseconds != 0) {
            whole -= 1; /* -2 s + 0.5 s is -1.5 s */
            fraction = NS_PER_SECOND - nanoseconds;
        }
    }
    length += decimal_text(text + length, whole);
    if (fraction == 0)
        return length;

    text[length++] = '.';
    for (int place = 8; place >= 0; place--) {
        text[length + place] = (char)('0' + fraction % 10);
        fraction /= 10;
    }
    length += 9;
    while (text[length - 1] == '0')
        length--;
    return length;
}

/* Split a time in ns since the epoch into floored seconds and the nanoseconds past them. */
static int
split_time(PyObject *time_ns, long long *seconds, long long *nanoseconds)
{
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(time_ns, &overflow);

    if (value == -1 && PyErr_Occurred())
        return -1;
    if (!overflow) {
        *seconds = value / NS_PER_SECOND;
        *nanoseconds = value % NS_PER_SECOND;
        if (*nanoseconds < 0) {
            *seconds -= 1;
            *nanoseconds += NS_PER_SECOND;
        }
        return 0;
    }

    /* Past year 2262 the ns do not fit 64 bits, while ext4's 34-bit seconds do. */
    PyObject *divisor = PyLong_FromLongLong(NS_PER_SECOND);
    if (divisor == NULL)
        return -1;
    PyObject *pair = PyNumber_Divmod(time_ns, divisor);
    Py_DECREF(divisor);
    if (pair == NULL)
        return -1;
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
        Py_DECREF(pair);
        PyErr_SetString(PyExc_TypeError, "invalid mtime_ns: divmod() did not give a pair");
        return -1;
    }
    *seconds = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 0));
    *nanoseconds = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
    Py_DECREF(pair);
    return PyErr_Occurred() ? -1 : 0;
}

static int
unsigned_argument(PyObject *value, const char *name, unsigned long long *out)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "invalid %s: expected an int, got %.100s", name,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(value);
    return *out == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}

static int
bytes_argument(PyObject *value, const char *name, const char **data, Py_ssize_t *length)
{
    if (!PyBytes_Check(value)) {
        PyErr_Format(PyExc_TypeError, "invalid %s: expected bytes, got %.100s", name,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    *data = PyBytes_AS_STRING(value);
    *length = PyBytes_GET_SIZE(value);
    return 0;
}

enum {
    ARG_NAME,
    ARG_TYPEFLAG,
    ARG_MODE,
    ARG_UID,
    ARG_GID,
    ARG_SIZE,
    ARG_MTIME_NS,
    ARG_LINKNAME,
    ARG_DEVICE,
    ARG_XATTR_RECORDS,
    ARG_COUNT
};

/* The entry's own records at most: mtime, path, linkpath, uid, gid and size. */
#define OWN_RECORDS 6

static PyObject *
header(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const char *name, *typeflag, *linkname;
    Py_ssize_t name_length, typeflag_length, linkname_length;
    unsigned long long mode, uid, gid, size, devmajor_value = 0, devminor_value = 0;
    long long devmajor = -1, devminor = -1, seconds, nanoseconds;
    (void)module;

    if (nargs != ARG_COUNT) {
        PyErr_Format(PyExc_TypeError, "header() takes %d arguments (%zd given)", ARG_COUNT,
                     nargs);
        return NULL;
    }
    if (bytes_argument(args[ARG_NAME], "name", &name, &name_length) < 0
        || bytes_argument(args[ARG_TYPEFLAG], "typeflag", &typeflag, &typeflag_length) < 0
        || unsigned_argument(args[ARG_MODE], "mode", &mode) < 0
        || unsigned_argument(args[ARG_UID], "uid", &uid) < 0
        || unsigned_argument(args[ARG_GID], "gid", &gid) < 0
        || unsigned_argument(args[ARG_SIZE], "size", &size) < 0
        || split_time(args[ARG_MTIME_NS], &seconds, &nanoseconds) < 0
        || bytes_argument(args[ARG_LINKNAME], "linkname", &linkname, &linkname_length) < 0)
        return NULL;
    if (typeflag_length != 1) {
        PyErr_SetString(PyExc_ValueError, "invalid typeflag: expected one byte");
        return NULL;
    }

    PyObject *device = args[ARG_DEVICE];
    if (device != Py_None) {
        if (!PyTuple_Check(device) || PyTuple_GET_SIZE(device) != 2
            || unsigned_argument(PyTuple_GET_ITEM(device, 0), "devmajor", &devmajor_value) < 0
            || unsigned_argument(PyTuple_GET_ITEM(device, 1), "devminor", &devminor_value) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "invalid device: expected (major, minor)");
            return NULL;
        }
        if (devmajor_value >= OCTAL_7_LIMIT || devminor_value >= OCTAL_7_LIMIT) {
            PyErr_SetString(PyExc_ValueError, "invalid device: a number exceeds 7 octal digits");
            return NULL;
        }
        devmajor = (long long)devmajor_value;
        devminor = (long long)devminor_value;
    }

    PyObject *xattr_records = args[ARG_XATTR_RECORDS];
    Py_ssize_t xattr_count = 0;
    if (xattr_records != Py_None) {
        if (!PyList_Check(xattr_records)) {
            PyErr_SetString(PyExc_TypeError, "invalid xattr_records: expected a list or None");
            return NULL;
        }
        xattr_count = PyList_GET_SIZE(xattr_records);
    }

    struct record own[OWN_RECORDS + 1];
    struct record *records = own;
    Py_ssize_t count = 0;
    PyObject *result = NULL;

    /* tarfile's order: mtime, xattrs by name, path, linkpath, uid, gid, size. */
    char mtime_text[48];
    unsigned long long mtime = (unsigned long long)seconds;
    if (nanoseconds != 0 || seconds < 0 || (unsigned long long)seconds >= OCTAL_11_LIMIT) {
        int length = pax_time(mtime_text, seconds, nanoseconds);
        own[count++] = (struct record){"mtime", 5, mtime_text, length};
        if (seconds < 0 || (unsigned long long)seconds >= OCTAL_11_LIMIT)
            mtime = 0;
    }

    if (xattr_count > 0) {
        records = PyMem_Malloc((size_t)(OWN_RECORDS + xattr_count) * sizeof(struct record));
        if (records == NULL)
            return PyErr_NoMemory();
        memcpy(records, own, (size_t)count * sizeof(struct record));
        for (Py_ssize_t index = 0; index < xattr_count; index++) {
            PyObject *pair = PyList_GET_ITEM(xattr_records, index);
            struct record *record = &records[count];
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
                || bytes_argument(PyTuple_GET_ITEM(pair, 0), "xattr keyword", &record->keyword,
                                  &record->keyword_length) < 0
                || bytes_argument(PyTuple_GET_ITEM(pair, 1), "xattr value", &record->value,
                                  &record->value_length) < 0) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError,
                                    "invalid xattr_records: expected (keyword, value) pairs");
                goto done;
            }
            count++;
        }
    }

    char name_field[NAME_FIELD], linkname_field[NAME_FIELD];
    const char *name_in_field = name, *linkname_in_field = linkname;
    Py_ssize_t name_field_length = name_length, linkname_field_length = linkname_length;
    if (name_length > NAME_FIELD || !is_ascii(name, name_length)) {
        records[count++] = (struct record){"path", 4, name, name_length};
        name_in_field = name_field;
        name_field_length = ustar_text(name_field, name, name_length);
    }
    if (linkname_length > NAME_FIELD || !is_ascii(linkname, linkname_length)) {
        records[count++] = (struct record){"linkpath", 8, linkname, linkname_length};
        linkname_in_field = linkname_field;
        linkname_field_length = ustar_text(linkname_field, linkname, linkname_length);
    }

    char uid_text[24], gid_text[24], size_text[24];
    if (uid >= OCTAL_7_LIMIT) {
        int length = decimal_text(uid_text, uid);
        records[count++] = (struct record){"uid", 3, uid_text, length};
        uid = 0;
    }
    if (gid >= OCTAL_7_LIMIT) {
        int length = decimal_text(gid_text, gid);
        records[count++] = (struct record){"gid", 3, gid_text, length};
        gid = 0;
    }
    if (size >= OCTAL_11_LIMIT) {
        int length = decimal_text(size_text, size);
        records[count++] = (struct record){"size", 4, size_text, length};
        size = 0;
    }

    /* A value that is not UTF-8 needs hdrcharset=BINARY ahead of the records. */
    Py_ssize_t payload_length = 0;
    int binary = 0;
    for (Py_ssize_t index = 0; index < count; index++) {
        payload_length += record_length(&records[index]);
        if (!binary && !is_utf8(records[index].value, records[index].value_length))
            binary = 1;
    }
    if (binary)
        payload_length += (Py_ssize_t)strlen(BINARY_CHARSET_RECORD);

    Py_ssize_t extended_length = 0;
    if (count > 0)
        extended_length = BLOCK_SIZE + (payload_length + BLOCK_SIZE - 1) / BLOCK_SIZE * BLOCK_SIZE;
    result = PyBytes_FromStringAndSize(NULL, extended_length + BLOCK_SIZE);
    if (result == NULL)
        goto done;
    char *out = PyBytes_AS_STRING(result);
    memset(out, 0, (size_t)(extended_length + BLOCK_SIZE));

    if (count > 0) {
        ustar_block(out, PAX_HEADER_NAME, (Py_ssize_t)strlen(PAX_HEADER_NAME), 'x', 0, 0, 0,
                    (unsigned long long)payload_length, 0, "", 0, -1, -1);
        char *position = out + BLOCK_SIZE;
        if (binary) {
            memcpy(position, BINARY_CHARSET_RECORD, strlen(BINARY_CHARSET_RECORD));
            position += strlen(BINARY_CHARSET_RECORD);
        }
        for (Py_ssize_t index = 0; index < count; index++) {
            const struct record *record = &records[index];
            position += decimal_text(position, (unsigned long long)record_length(record));
            *position++ = ' ';
            memcpy(position, record->keyword, (size_t)record->keyword_length);
            position += record->keyword_length;
            *position++ = '=';
            memcpy(position, record->value, (size_t)record->value_length);
            position += record->value_length;
            *position++ = '\n';
        }
    }

    ustar_block(out + extended_length, name_in_field, name_field_length, typeflag[0], mode & 07777,
                uid, gid, size, mtime, linkname_in_field, linkname_field_length, devmajor,
                devminor);

done:
    if (records != own)
        PyMem_Free(records);
    return result;
}

static PyMethodDef methods[] = {
    {"header", (PyCFunction)(void (*)(void))header, METH_FASTCALL,
     "header(name, typeflag, mode, uid, gid, size, mtime_ns, linkname, device, xattr_records)\n"
     "--\n\n"
     "Return an entry's PAX extended header, when it needs one, and its ustar header."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "lcow.layer._ustar",
    .m_doc = "An exported entry's tar header blocks, written in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__ustar(void)
{
    return PyModule_Create(&module_definition);
}
