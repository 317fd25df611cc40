import { createRoot } from 'react-dom/client';
import App from './App.jsx';
import './styles.css';

// No <StrictMode>: in development it mounts every component twice, and useChat's
// `resume: true` would then open the resume request twice (the first one aborted).
createRoot(document.getElementById('root')).render(<App />);
