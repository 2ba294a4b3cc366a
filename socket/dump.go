package socket

import "strconv"

// dump writes one message to Options.Dump, if set, in one write (so the control and data
// goroutines' dumps never interleave within a message).
func (s *Server) dump(title string, b []byte) {
	if s.opts.Dump == nil {
		return
	}
	s.dumpMu.Lock()
	defer s.dumpMu.Unlock()
	s.opts.Dump.Write(AppendDump(nil, title, b))
}

// AppendDump appends a message in swtpm's traffic dump format (its --log at level 2 and up):
// a title line " <title>: length <n>", then the bytes as uppercase hex, 16 to a line, each
// line starting with a space and each byte followed by one.
func AppendDump(out []byte, title string, b []byte) []byte {
	const hex = "0123456789ABCDEF"
	out = append(out, ' ')
	out = append(out, title...)
	out = append(out, ": length "...)
	out = strconv.AppendInt(out, int64(len(b)), 10)
	out = append(out, '\n')
	for i, c := range b {
		if i%16 == 0 {
			out = append(out, ' ')
		}
		out = append(out, hex[c>>4], hex[c&15], ' ')
		if i%16 == 15 || i == len(b)-1 {
			out = append(out, '\n')
		}
	}
	return out
}
